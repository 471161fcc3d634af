package nacos_test

import (
	"fmt"
	"os"
	"testing"

	"go.uber.org/goleak"
)

// origEnv is HOME and XDG_CACHE_HOME as they were before TestMain changed
// them: the go command building the child test binary needs them to find its
// module and build caches.
var origEnv []string

// TestMain points the user cache directory (where NewClient puts the SDK's
// cache) at a temporary directory, and checks for leaked goroutines: the
// SDK's UDP push receivers included, which NewClient's clients stop.
func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "rollcall-nacos-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	origEnv = []string{"HOME=" + os.Getenv("HOME"), "XDG_CACHE_HOME=" + os.Getenv("XDG_CACHE_HOME")}
	os.Setenv("XDG_CACHE_HOME", dir) // os.UserCacheDir on Linux and BSDs
	os.Setenv("HOME", dir)           // on macOS
	goleak.VerifyTestMain(m, goleak.Cleanup(func(code int) {
		os.RemoveAll(dir)
		removeNoRaceBinary()
		os.Exit(code)
	}))
}
