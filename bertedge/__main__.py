from bertedge.cli import main

main()
