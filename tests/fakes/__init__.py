"""Local stand-ins, speaking the real wire format, for servers that cannot run on these machines."""
