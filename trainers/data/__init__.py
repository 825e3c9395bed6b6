"""Dataset fetching (torch-free) and loading."""
