"""Integrations with other libraries (imported on use: ``ctm_kernels.integrations.peft``)."""
