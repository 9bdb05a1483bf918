"""Lightning trainers, networks, diffusion and generation (filled in by the training issues)."""
