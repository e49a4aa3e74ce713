"""Other checkpoint formats: Flash STU models written by the reference implementations (import, and export
back to flash-stu-2), and Hugging Face transformers directories (export).

* `source`: reading a source (a `save_pretrained` directory, a safetensors or torch state dict) lazily,
  memory-mapped, with its `config.json`.
* `formats`: the two reference formats' config fields -> one `SourceArch` (Flash STU 2 "flash-stu-2",
  the SpectraLDS paper code "spectralds-paper"), every quirk of theirs decided there.
* `filter_match`: the source's spectral filter bank against ours (order and signs, measured).
* `flash_stu`: the key mapping, `import_flash_stu` and the checkpoint it writes; `export_flash_stu2`
  (from `flash_stu_export`: a LanguageModel -> a flash-stu-2 directory, or a one-line refusal).
* `hf_*`: a transformers directory (config, model, tokenizer) and the Auto-class registration.
"""
