"""torchpool benchmarks: the suite (`benchmarks.suite`) and its runner (`python -m benchmarks.run`)."""
