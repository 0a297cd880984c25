"""Entry point of the demo (and of a Hugging Face Space): ``python app.py --help``."""

print("the app arrives in a later issue")
