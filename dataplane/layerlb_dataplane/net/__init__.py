"""What a connection carries below HTTP: the PROXY protocol codec, TLS contexts, transparent sockets."""
