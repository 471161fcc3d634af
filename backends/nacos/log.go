package nacos

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"

	sdklog "github.com/nacos-group/nacos-sdk-go/v2/common/logger"
)

// The SDK has one process-wide logger (common/logger.SetLogger). sdkLogger
// implements its interface over slog and is installed once; sdkTarget is the
// slog.Logger it writes to (slog.Default() when nil), set by the last
// NewClient or New with a Logger.
var (
	sdkTarget     atomic.Pointer[slog.Logger]
	sdkLoggerOnce sync.Once
)

func routeSDKLogs(l *slog.Logger) {
	sdkTarget.Store(l)
	sdkLoggerOnce.Do(func() { sdklog.SetLogger(SDKLogger{}) })
}

// SDKLogger is the SDK's logger interface (common/logger.Logger) over slog,
// for users who install it themselves. SDK info and debug lines go out at
// slog Debug (the SDK logs every request at info), warnings at Info and errors
// at Warn (the SDK logs an error for each closed stream and failed retry; the
// backend reports what matters itself: unreachable server, lost
// registrations), with the attribute component=nacos-sdk; stack traces are
// cut. Passwords given to
// NewClient and access tokens are replaced by "xxxxx". It writes to the Logger
// given to the last NewClient or New, or slog.Default().
type SDKLogger struct{}

var _ sdklog.Logger = SDKLogger{}

func (SDKLogger) emit(level slog.Level, msg func() string) {
	l := sdkTarget.Load()
	if l == nil {
		l = slog.Default()
	}
	ctx := context.Background()
	if !l.Enabled(ctx, level) {
		return
	}
	m := msg()
	if i := strings.IndexByte(m, '\n'); i >= 0 {
		m = m[:i] // the SDK prints errors with %+v: drop their stack traces
	}
	l.Log(ctx, level, scrub(m), "component", "nacos-sdk")
}

func (s SDKLogger) Info(args ...any) {
	s.emit(slog.LevelDebug, func() string { return fmt.Sprint(args...) })
}
func (s SDKLogger) Warn(args ...any) {
	s.emit(slog.LevelInfo, func() string { return fmt.Sprint(args...) })
}
func (s SDKLogger) Error(args ...any) {
	s.emit(slog.LevelWarn, func() string { return fmt.Sprint(args...) })
}
func (s SDKLogger) Debug(args ...any) {
	s.emit(slog.LevelDebug, func() string { return fmt.Sprint(args...) })
}
func (s SDKLogger) Infof(f string, args ...any) {
	s.emit(slog.LevelDebug, func() string { return fmt.Sprintf(f, args...) })
}
func (s SDKLogger) Warnf(f string, args ...any) {
	s.emit(slog.LevelInfo, func() string { return fmt.Sprintf(f, args...) })
}
func (s SDKLogger) Errorf(f string, args ...any) {
	s.emit(slog.LevelWarn, func() string { return fmt.Sprintf(f, args...) })
}
func (s SDKLogger) Debugf(f string, args ...any) {
	s.emit(slog.LevelDebug, func() string { return fmt.Sprintf(f, args...) })
}

// Close does nothing; the SDK calls it when another logger replaces this one.
func (SDKLogger) Close() error { return nil }

// secrets are the passwords of live clients, scrubbed from SDK log lines.
var secrets struct {
	sync.Mutex
	n map[string]int
}

func addSecret(s string) {
	if s == "" {
		return
	}
	secrets.Lock()
	defer secrets.Unlock()
	if secrets.n == nil {
		secrets.n = map[string]int{}
	}
	secrets.n[s]++
}

func removeSecret(s string) {
	if s == "" {
		return
	}
	secrets.Lock()
	defer secrets.Unlock()
	if secrets.n[s]--; secrets.n[s] <= 0 {
		delete(secrets.n, s)
	}
}

// tokenRe matches access tokens as the SDK prints them in request headers
// and parameters (accessToken:..., "accessToken":"...", accessToken=...).
var tokenRe = regexp.MustCompile(`(?i)(access_?token"?\s*[:=]\s*"?)[^"\s,}\]&]+`)

func scrub(msg string) string {
	secrets.Lock()
	for s := range secrets.n {
		msg = strings.ReplaceAll(msg, s, "xxxxx")
	}
	secrets.Unlock()
	return tokenRe.ReplaceAllString(msg, "${1}xxxxx")
}

// scrubErr returns err, or an error with err's text scrubbed when it holds a
// secret (the original is then not wrapped, so that no caller can print it).
func scrubErr(err error, secret string) error {
	if err == nil || secret == "" || !strings.Contains(err.Error(), secret) {
		return err
	}
	return errors.New(strings.ReplaceAll(err.Error(), secret, "xxxxx"))
}
