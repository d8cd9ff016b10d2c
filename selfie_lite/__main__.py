from selfie_lite.cli import main

main()
