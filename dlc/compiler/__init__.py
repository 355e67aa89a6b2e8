"""The dlc compiler: export, pass pipeline, engine emission and engine loading."""
