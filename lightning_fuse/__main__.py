from lightning_fuse.cli import main

main()
