package nacosserver

import (
	"fmt"
	"os"
	"testing"

	"github.com/nacos-group/nacos-sdk-go/v2/common/logger"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	// The SDK's logger is process-global and initialised once, by the first
	// client, to write into that client's LogDir through lumberjack (whose
	// goroutine never stops and whose file would outlive the test's TempDir).
	// Install ours first so that InitLogger is a no-op.
	logger.SetLogger(sdkLogger{verbose: os.Getenv("NACOSSERVER_SDKLOG") != ""})
	code := m.Run()
	removeNoRaceBinary()
	if code == 0 {
		if err := goleak.Find(
			// nacos-sdk-go v2.3.5 clients/naming_client/naming_http/push_receiver.go:
			// every NewNamingClient starts a UDP listener (ports 54951-55950)
			// whose goroutine blocks in ReadFromUDP and only checks its context
			// between packets; the UDP socket is never closed, so the goroutine
			// outlives CloseClient forever.
			goleak.IgnoreAnyFunction("github.com/nacos-group/nacos-sdk-go/v2/clients/naming_client/naming_http.(*PushReceiver).startServer.func1"),
		); err != nil {
			fmt.Fprintf(os.Stderr, "goleak: %v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}

// sdkLogger discards the SDK's logs unless NACOSSERVER_SDKLOG is set.
type sdkLogger struct{ verbose bool }

func (l sdkLogger) out(level, msg string) {
	if l.verbose {
		fmt.Fprintf(os.Stderr, "nacos-sdk %s %s\n", level, msg)
	}
}

func (l sdkLogger) Info(args ...any)             { l.out("INFO", fmt.Sprint(args...)) }
func (l sdkLogger) Warn(args ...any)             { l.out("WARN", fmt.Sprint(args...)) }
func (l sdkLogger) Error(args ...any)            { l.out("ERROR", fmt.Sprint(args...)) }
func (l sdkLogger) Debug(args ...any)            { l.out("DEBUG", fmt.Sprint(args...)) }
func (l sdkLogger) Infof(f string, args ...any)  { l.out("INFO", fmt.Sprintf(f, args...)) }
func (l sdkLogger) Warnf(f string, args ...any)  { l.out("WARN", fmt.Sprintf(f, args...)) }
func (l sdkLogger) Errorf(f string, args ...any) { l.out("ERROR", fmt.Sprintf(f, args...)) }
func (l sdkLogger) Debugf(f string, args ...any) { l.out("DEBUG", fmt.Sprintf(f, args...)) }
func (l sdkLogger) Close() error                 { return nil }
