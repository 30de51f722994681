"""The embedding plane: the engine that schedules forward passes and checks vectors, and one provider module per kind of model."""
