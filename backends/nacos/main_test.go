package nacos_test

import (
	"fmt"
	"os"
	"testing"

	"go.uber.org/goleak"
)

// TestMain points the user cache directory (where NewClient puts the SDK's
// cache) at a temporary directory, and checks for leaked goroutines: the
// SDK's UDP push receivers included, which NewClient's clients stop.
func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "rollcall-nacos-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	os.Setenv("XDG_CACHE_HOME", dir) // os.UserCacheDir on Linux and BSDs
	os.Setenv("HOME", dir)           // on macOS
	goleak.VerifyTestMain(m, goleak.Cleanup(func(code int) {
		os.RemoveAll(dir)
		removeNoRaceBinary()
		os.Exit(code)
	}))
}
