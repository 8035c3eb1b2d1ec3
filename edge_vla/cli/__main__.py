from edge_vla.cli import main

main()
