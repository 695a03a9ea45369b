"""metrics stage of anomalydiff."""
