"""postprocess stage of anomalydiff."""
