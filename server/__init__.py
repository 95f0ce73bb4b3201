"""HTTP side of dtype-serve: FastAPI only; all MLX work goes through the engine interface."""
