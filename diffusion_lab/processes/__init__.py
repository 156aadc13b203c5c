"""Forward corruption processes: what x_t given x_0 is."""
