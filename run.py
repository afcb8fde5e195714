"""jaxtl command line: `python run.py predict --model efficientnet_lite0 IMAGE...`; `python run.py -h` for all."""

from jaxtl.cli import main

if __name__ == "__main__":
    main()
