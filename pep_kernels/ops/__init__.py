"""Kernels and their torch.library registrations; nothing here knows about models or files."""
