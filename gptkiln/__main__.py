from gptkiln.cli import run

run()
