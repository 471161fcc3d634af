//go:build !linux

package nacos

// On systems without /proc the SDK's UDP push receiver of each client (see
// udpleak_linux.go) is left running after CloseClient, as the SDK leaves it.

func udpReceivers() map[int]bool   { return nil }
func wakeUDPReceivers(ports []int) {}
