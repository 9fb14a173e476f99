"""The I/O-free core shared by agent, server and simulator.

Bytes, registers and dicts in; frozen typed models out. Nothing here opens a socket,
starts a loop or imports a network client (house style, habit 1).
"""
