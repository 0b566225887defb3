"""Plain-PyTorch reference pruners: the oracles every fast path must equal."""
