"""2:4 matmul backends."""
