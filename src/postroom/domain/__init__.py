"""Pure code, no I/O: the message model, status machine, address checks, retry policy, MIME."""
