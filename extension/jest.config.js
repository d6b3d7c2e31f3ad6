// jest runs the tests of the extension's pure modules (src/__tests__/*.spec.ts) in node, through
// ts-jest: they import no JupyterLab package and touch no DOM, so neither babel nor jsdom is needed.
module.exports = {
  preset: 'ts-jest',
  testEnvironment: 'node',
  testRegex: 'src/.*/.*\\.spec\\.ts$'
};
