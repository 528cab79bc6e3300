"""The Hub: ``client`` (every request to the Hub), model-card sections (``card``, ``card_edit``)
and the Space deploy (``space``). Importing the package imports nothing."""
