"""diffusion stage of anomalydiff."""
