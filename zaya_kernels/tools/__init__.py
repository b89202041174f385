"""Developer tools: the ahead-of-time compile report and the GPU compile checks."""
