"""The embedding plane: the engine that schedules forward passes and checks vectors, one provider module per kind of model, and the adapters between two models' spaces."""
