"""Adapters to the units: Modbus (TCP and RTU) and the site-local MQTT broker."""
