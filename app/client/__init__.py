"""What host services import: the reader, column search and the read-miss publisher. Imports no tooling, starts no service."""
