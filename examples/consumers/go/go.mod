module example.com/maintenance-bridge-consumer

go 1.19
