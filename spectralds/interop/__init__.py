"""Other formats: Hugging Face transformers directories (`hf_*`) and the Flash STU reference formats."""
