"""The `emu` command line: one entry point for the simulator, agent, server and operator verbs."""
