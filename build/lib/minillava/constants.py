"""Constants shared with LLaVA (llava/constants.py): label ignore index, image placeholder id and token."""

IGNORE_INDEX = -100  # labels with this value get no loss (torch cross_entropy's default ignore_index)
IMAGE_TOKEN_INDEX = -200  # placeholder id spliced into input_ids where an image's features go
DEFAULT_IMAGE_TOKEN = "<image>"  # literal marker in the conversation text

