"""Training of the EBM, DDPM, D-VAE and classifiers (planned: training issue)."""
