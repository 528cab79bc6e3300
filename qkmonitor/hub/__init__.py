"""Publishing to the Hugging Face Hub: model-card sections (``card``, ``card_edit``)."""
