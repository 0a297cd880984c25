"""Entry point of the demo (and of a Hugging Face Space): ``python app.py --help``."""

from app.cli import main

if __name__ == "__main__":
    main()
