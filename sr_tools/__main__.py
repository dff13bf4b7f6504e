from sr_tools.cli import main

main()
