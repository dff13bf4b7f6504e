"""Block I/O shared by the NVMe/TCP target and the NBD server."""
