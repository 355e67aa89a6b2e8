"""dlc runtime: reference diffusion decoding, phase runners (eager and compiled), scheduler and server."""
