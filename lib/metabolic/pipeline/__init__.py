"""The study's stages in data-flow order (the only place that runs stages) and the headless study."""
