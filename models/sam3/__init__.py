"""SAM 3: loading (local files only), the LoRA config, inference, HU windowing, tiny test configs."""
