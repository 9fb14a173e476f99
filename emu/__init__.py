"""The `emu` command line: one entry point for the simulator, agent, server and operator verbs."""

import warnings

# asyncssh (2.24) still registers DSA keys, which cryptography 51 deprecates at import. We never
# accept or offer DSA (Ed25519 host and user keys only), so the warning tells an operator nothing.
warnings.filterwarnings("ignore", message="DSA is deprecated", module="asyncssh")
