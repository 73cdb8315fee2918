"""HTTP endpoints: one module per public API surface, each a thin shell over the pipeline."""
