"""predict stage of anomalydiff."""
