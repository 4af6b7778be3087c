"""Built-in data for trying the method: the synthetic head phantom and the quickstart."""
