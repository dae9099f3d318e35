"""The CLI and one module per job: config in, wiring datasets -> actors -> analysis, outputs out."""
