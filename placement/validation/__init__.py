"""Published, measured latencies the latency model is validated against (points.csv), the
model shapes they were measured on, and how points.csv was built from its sources."""
